"""Collecting rankings: the labeling database (`store`), its HTTP API and page (`app`), and the
`chatrlhf label ...` commands (`commands`)."""
