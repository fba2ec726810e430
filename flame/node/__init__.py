"""The runner side: everything a node process runs, and nothing of the parent side.

Imports here stay light (zmq, cloudpickle and the standard library): a runner must
start about as fast as ``python -c "import zmq, cloudpickle"``.
"""
