"""mimo: MiMo-V2-Flash in PyTorch."""
