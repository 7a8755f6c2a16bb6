"""``python -m mimscale <command>``: the same as the ``mimscale`` console script (cli.py)."""
from mimscale.cli import run

if __name__ == "__main__":
    run()
