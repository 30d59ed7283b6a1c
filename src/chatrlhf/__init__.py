"""chatrlhf: train a chat model the InstructGPT way (SFT, reward model from rankings, PPO) and serve it."""

__version__ = "0.1.0"
