"""Models that ship with mlxgpt (installed as the ``mlxgpt.models`` package)."""
