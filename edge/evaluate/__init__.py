"""Accuracy evaluation, one module per seam:

- `rates`: error-rate maths, pure (accuracy, cross-validated thresholds, VAL/FRR at a FAR, AUC, d′);
- `embedding`: the shared embedding pass (which face of a photo counts, each image once, worker processes);
- `pairs`: `eval-pairs`, 1:1 on an LFW pairs.txt or a CSV pair list;
- `ident`: `eval-ident`, open-set 1:N on a folder per person;
- `templates`: `eval-templates`, K-photo templates against M-photo probes down to FAR 1e-6, with its embedding cache;
- `calibrate`: `calibrate`, the threshold for a FAR (pairs, store) or for each security level (a folder's regime);
- `config_file`: writing the calibrated threshold into config.yaml; `report`: JSON numbers and PNG figures.
"""
