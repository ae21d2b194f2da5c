"""Pictures of a run: SimMIM reconstructions, label-query attention, training curves.

* :mod:`~hvpmtl.viz.recon`: input / masked input / reconstruction / pasted grid;
* :mod:`~hvpmtl.viz.attention`: top predicted labels with their query's cross-attention heat-map;
* :mod:`~hvpmtl.viz.curves`: losses, learning rate, ``swav_collapse``, gradient shares, k-NN and
  downstream results of ``metrics.csv`` and ``eval/*.json`` (matplotlib, the ``viz`` extra);
* :mod:`~hvpmtl.viz.pictures`: the held-out images shown, and pictures during pre-training
  (``train.pictures_every``);
* :mod:`~hvpmtl.viz.grid`: tiling, captions, colours, PNG writing (torchvision + PIL).
* :mod:`~hvpmtl.viz.dataset`: the plots of ``hvpmtl data inspect`` (matplotlib).

The command line is ``hvpmtl visualize {recon,attention,curves} RUN``.
"""
