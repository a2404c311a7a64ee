"""HTML report builder: one self-contained page per study, plus an index of claims."""
