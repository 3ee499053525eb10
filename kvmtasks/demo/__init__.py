"""The demo (``python -m kvmtasks.demo``) and the tiny guest image it and the tests boot."""
