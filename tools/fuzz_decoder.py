"""Coverage-guided fuzzing of everything that parses bytes from the network
before a connection is trusted: the header decoder, the JSON control decoder
and the server's DECLARE validation.  Any exception other than ProtocolError
is a bug.

    python tools/fuzz_decoder.py -runs=200000        # the long run
    python tools/fuzz_decoder.py -max_total_time=20  # what CI runs (tests/test_fuzz_harness.py)

Needs atheris (pip install atheris)."""
import sys

import atheris

with atheris.instrument_imports(include=["rdmakv"]):
    from rdmakv.core import protocol
    from rdmakv.core.errors import ProtocolError
    from rdmakv.server.server import ParameterServer

SERVER = None


def one_input(data):
    global SERVER
    if SERVER is None:
        SERVER = ParameterServer(num_servers=2, scheduler_host="127.0.0.1", node_host="127.0.0.1",
                                 transport="tcp")
    head, payload = data[:protocol.HEADER_SIZE], data[protocol.HEADER_SIZE:]
    try:
        protocol.unpack(head)
    except ProtocolError:
        pass
    try:
        obj = protocol.decode_json(payload)
    except ProtocolError:
        return
    try:
        SERVER._validate_layout(5, obj)
    except ProtocolError:
        pass


def main():
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
