"""A procedurally generated driving world written in the nuScenes on-disk format.

Modules: rig (sensor rig, classes, materials), town (road grid, raster, scenery), traffic (ego
route, moving and parked objects), raycast (analytic ray casting), sensors (LiDAR and cameras),
tables / mapexp (nuScenes tables and map expansion), simulate (one scene end to end),
world_io (rebuild a world from a dataroot; ground-truth depth).
"""
