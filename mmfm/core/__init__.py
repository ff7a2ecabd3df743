"""The bottom layer, shared by every other: the types that cross layers (`types`), the error
hierarchy (`errors`), input files and URLs (`files`), the pinned public example data
(`examples`) and the zigzag layout of rows for context parallelism (`zigzag`). Nothing here
imports any other part of mmfm."""
