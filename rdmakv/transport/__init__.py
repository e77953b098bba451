"""Transports: policy modules over the mechanism in rdmakv._transport."""
