"""Router training: train only the routers of a merged MoE model on text, and write a new model folder."""
