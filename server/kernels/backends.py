"""Which fast backends this process can use: every op family's dispatch asks here."""
import functools


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton can be imported (it is not a declared dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
