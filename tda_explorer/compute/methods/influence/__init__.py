"""Influence functions, one module per iHVP solver family: explicit and CG (``direct``), LiSSA, Arnoldi, ASTRA,
K-FAC / EK-FAC and DataInf."""
