"""Offline export of pretrained audio encoders (BEATs, CED, EfficientAT-MN) to ONNX. Uses torch."""

# 0.6.0: mn04's and mn05's stem, block 1 and block 2's expansion folded into three convolutions (stem);
# 0.5.0: the split DFT computes half its stage-1 columns (the signal is real), contracts only b in stage 2 and
# leaves the power in row order (the mel filters follow); --layers default;
# 0.4.0: time-delta pooling, mn04 default layers 6+11+12, the split DFT's stage 1 as a grouped conv;
# 0.3.0: EfficientAT split-DFT front-end (frontend_stft); 0.2.0: poolings
EXPORTER_VERSION = "0.6.0"
