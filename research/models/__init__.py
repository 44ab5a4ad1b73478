from research.models.registry import available, get_model, register_model  # noqa: F401
