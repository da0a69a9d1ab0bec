"""nnU-Net's side of pcl-hpc: its plans' 2D network as the encoder to pretrain, its preprocessed cases
as the store, and the hand-off file ``nnUNetv2_train ... -pretrained_weights`` loads.

The only package that imports nnunetv2 and dynamic_network_architectures (the ``nnunet`` extra:
``pip install 'pcl-hpc[nnunet]'``); the imports happen inside the functions, so the rest of
pcl-hpc runs without them.
"""
