"""MLX models, one module per component. Layouts are channels-last; each module documents its shapes."""
