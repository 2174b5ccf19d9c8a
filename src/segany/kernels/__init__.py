"""Hand-written GPU kernels for the fast inference path (:mod:`segany.fast`); each has an exact PyTorch twin."""
