"""Visual tokenizers: SEED-style images, HiMTok-style masks, LWM-style video frames."""
