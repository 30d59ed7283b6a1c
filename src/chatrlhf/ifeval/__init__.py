"""IFEval: lm-eval's checkers (`checkers`) and `chatrlhf eval --benchmark ifeval` (`benchmark`)."""
