"""Reference training loops (SFT, DPO); each is a user of the public capture API."""
