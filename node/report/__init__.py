"""Result objects for the PACS: one TID 1500 SR per study (sr.py) and Grad-CAM Secondary
Captures (sc.py), with deterministic UIDs (uids.py), their codes and names (codes.py), and the
patient/study attributes copied from the source (sources.py).
"""
