"""Around training: one encoder face for every model, corpus indexes and search, hard-negative mining, TREC runs,
MTEB. (Imports nothing at package level: the modules are independent.)"""
