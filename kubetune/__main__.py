"""`python -m kubetune`: the command-line interface (the same as the `kubetune` command)."""

from kubetune.cli import main

if __name__ == "__main__":
    main()
