"""Training of V-Bridge LoRAs: flow matching on LQ -> HQ pseudo-videos (entry points in ``trainer``)."""
