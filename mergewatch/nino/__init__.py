"""NiNo, the pre-trained "nowcasting" meta-network that MetaMerge merges with (METAMERGE.md; Knyazev
et al., ICLR 2025), outside the strategies because reading its checkpoints and caching a graph's
eigenvectors are file I/O. ``mergewatch.strategies.metamerge`` drives it.

* ``context``       the 5-state context both variants share: slot order, normalisation, horizons.
* ``checkpoint``    reading and validating ``nino_mlp*.pt`` and ``nino_no_posw.pt`` (weights only).
* ``mlp``           NiNo-MLP's forward and the MetaMerge of one tensor with it.
* ``graph``         the neural graph of an open_clip ViT visual tower (NiNo-GNN's input).
* ``eigenvectors``  the graph's Laplacian positional encoding: injected, cached on disk or computed.
* ``gnn``           NiNo-GNN's chunked forward and the MetaMerge of one graph with it.
* ``workers``       the worker threads both forwards run their chunks on.
"""
