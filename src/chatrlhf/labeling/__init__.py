"""Collecting rankings: the labeling database (`schema` its tables, `store` the operations, `validation` what
it accepts, `views` what it gives back, `agreement` the maths of labelers agreeing), its HTTP API and page
(`app`), simulated labelers (`auto`) and the `chatrlhf label ...` commands (`commands`)."""
