"""The bottom layer, shared by every other: the types that cross layers (`types`), the error
hierarchy (`errors`), the built-in and registered modalities (`modalities`), input files and
URLs (`files`), the pinned public example data (`examples`), the zigzag layout of rows for
context parallelism (`zigzag`) and every use of a private torch API (`torch_compat`, each
shim tested, torch pinned to the tested range). Nothing here imports any other part of
mmfm."""
