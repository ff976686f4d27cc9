"""An HTTPS server that requires a client certificate signed by a given CA and answers each
request with the client certificate's common name: the far side of mutual TLS.

Usage: tls_backend.py PORT CERT KEY CLIENT_CA"""

import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        subject = dict(item[0] for item in self.connection.getpeercert()["subject"])
        body = subject["commonName"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        # One request per connection, so each handshake shows the certificate in use.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


port, cert, key, client_ca = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.load_verify_locations(client_ca)
context.verify_mode = ssl.CERT_REQUIRED
server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
