"""What a study's report page shows beyond its text: figures and equations.

:mod:`simulations.pages.figure` draws deterministic figures (:func:`~simulations.pages.figure.make_figure`),
:mod:`simulations.pages.symbols` holds the sympy symbols the pages share, and each study's module
here (named by its ``Study.page``) gives ``figures(frame, summary)`` and ``equations()``.
"""
