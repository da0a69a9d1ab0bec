"""pcl-hpc: Positional Contrastive Learning for volumetric CT/MRI, at cluster scale."""

__version__ = "0.1.0"
