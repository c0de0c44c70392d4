"""Library behind ``examples/msd_colon.py``: the paper's colon U-Net experiment, end to end.

One job per module:

- :mod:`.download`   -- fetch, verify (md5) and safely extract the MSD Task10_Colon tar
- :mod:`.phantom`    -- deterministic synthetic CT phantom in the Task10_Colon layout
- :mod:`.data`       -- case list, NIfTI loading, HU window, memory-mapped slice store
- :mod:`.splits`     -- patient / slice splits, 80/20 and k-fold, seeded
- :mod:`.evaluation` -- Dice and IoU in four averaging conventions
- :mod:`.training`   -- one training run (U-Net, Adam, plateau LR, AMP, DDP, checkpoints)
- :mod:`.experiments`-- the grids of the paper's Tables 1-4 and the t-tests
- :mod:`.report`     -- report.md, runs.csv and figures
"""

PAPER_TITLE = (
    "Dynamic Alteration of the Loss Function in Convolutional Neural Networks "
    "for Medical Image Segmentation (de Souza & Machado)"
)
