"""Library behind ``examples/msd_colon.py``: the paper's colon U-Net experiment, end to end.

One job per module:

- :mod:`.errors`      -- the errors the CLI reports in one line
- :mod:`.options`     -- presets (demo, paper) and the checks of the command-line options
- :mod:`.download`    -- fetch, verify (md5) and safely extract the MSD Task10_Colon tar
- :mod:`.phantom`     -- deterministic synthetic CT phantom in the Task10_Colon layout
- :mod:`.data`        -- case list, validation, orientation, HU window, memory-mapped slice store
- :mod:`.fingerprint` -- what determines a result (data digests, options, code), differences
- :mod:`.splits`      -- patient / slice splits, 80/20 and k-fold, seeded
- :mod:`.evaluation`  -- Dice and IoU in four averaging conventions
- :mod:`.model`       -- U-Net, encoder weights, precise BN, dynloss losses
- :mod:`.distributed` -- torchrun ranks, barrier, broadcast
- :mod:`.training`    -- one training run (Adam, plateau LR, LR at the switch, AMP, checkpoints,
  reuse / resume by fingerprint)
- :mod:`.benchmark`   -- ``--benchmark``: images/s and the loss's share of a step
- :mod:`.experiments` -- the grids of Tables 1-4 and beyond the paper, the t-tests
- :mod:`.runner`      -- glue: options -> data -> runs -> report
- :mod:`.outlock`     -- one invocation per ``--out`` at a time (``OUT/.lock``)
- :mod:`.report`      -- report.md (warnings, tables, sections) and runs.csv
- :mod:`.figures`     -- loss curves and the qualitative slice
"""

PAPER_TITLE = (
    "Dynamic Alteration of the Loss Function in Convolutional Neural Networks "
    "for Medical Image Segmentation (de Souza & Machado)"
)
