"""``python -m lightning_bv.cli``: the ``lightning-bv`` console script."""

from lightning_bv.cli.app import main

if __name__ == "__main__":
    main()
