"""Sound in: reading and cutting audio files, live and replayed sources, the ring they write
into, the sensor checks every window passes first, and mixing clean audio with site noise."""
