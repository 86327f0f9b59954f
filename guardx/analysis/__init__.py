"""The paper's analyses: input-Hessian spectra (Fig. 2) and distilled-image grids (Fig. 1/3).

``guardx analyze curvature`` and ``guardx analyze grid`` (see :mod:`guardx.analysis.cli`); the pieces
are :func:`guardx.analysis.hessian.hessian_eigenvalues`, :mod:`guardx.analysis.curvature` and
:mod:`guardx.analysis.grid`. They read saved models and images; they import no training code.
"""
