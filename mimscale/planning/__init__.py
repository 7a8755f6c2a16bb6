"""The memory planner's parts (``python -m mimscale.plan`` is the command):

    activations.py   what one training step's forward keeps for the backward, traced on the meta device
    model_states.py  parameters, gradients and optimizer states per GPU (DeepSpeed's estimators), buffers
"""
