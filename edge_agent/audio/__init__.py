"""Audio in: WAV files, resampling, and cutting clips and streams into encoder windows."""
