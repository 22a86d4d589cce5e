"""lit_ft: SFT, reward modelling and PPO on one QLoRA backbone, driven by LightningCLI."""

__version__ = "0.1.0"
