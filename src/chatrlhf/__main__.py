"""`python -m chatrlhf ...` (the form `accelerate launch -m chatrlhf` uses)."""

from chatrlhf.cli import main

if __name__ == "__main__":
    main()
