"""edgemri: distill a tiny brain-MRI classifier, personalize it with Flower, keep data on device."""


def __getattr__(name: str) -> str:
    # Computed on first use, not at import: the console script installs its signal handlers before anything
    # heavier than this package's own folder is imported.
    if name == "__version__":
        from edgemri.core.errors import version

        return version()
    raise AttributeError(f"module 'edgemri' has no attribute {name!r}")
