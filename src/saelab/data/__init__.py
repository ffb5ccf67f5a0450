"""Data for saelab: synthetic superposition data (:mod:`saelab.data.toy`)."""
