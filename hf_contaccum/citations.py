"""The papers behind the methods, as BibTeX (model cards and sentence-transformers' `citation`)."""

CONTACCUM_BIBTEX = """@inproceedings{kim2024contaccum,
  title     = {A Gradient Accumulation Method for Dense Retriever under Memory Constraint},
  author    = {Kim, Jaehee and Lee, Yookyung and Kang, Pilsung},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2024},
  eprint    = {2406.12356},
  archivePrefix = {arXiv}
}"""

GRADCACHE_BIBTEX = """@inproceedings{gao2021gradcache,
  title     = {Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
  author    = {Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
  booktitle = {Proceedings of the 6th Workshop on Representation Learning for NLP},
  year      = {2021},
  eprint    = {2101.06983},
  archivePrefix = {arXiv}
}"""
