"""Stand-ins for the torchaudio augmentation classes the official code names (unused in eval mode)."""


class FrequencyMasking:
    pass


class TimeMasking:
    pass
