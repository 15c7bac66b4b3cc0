"""A real OAuth 2.0 token endpoint built with authlib (PyPI) on Flask, for the agent's token
client: client_credentials for clients registered with client_secret_basic or
client_secret_post, ids and secrets full of characters that must be encoded.

Usage: python authlib_token_server.py CLIENTS_JSON
  CLIENTS_JSON: [{"client_id", "client_secret", "auth_method"}]
Prints "PORT <n>" once listening on 127.0.0.1, then one line per token request:
"REQUEST <auth method used> <outcome>".
"""

import json
import os
import secrets
import sys

from flask import Flask, request
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from werkzeug.serving import make_server


class Client(ClientMixin):
    def __init__(self, client_id, client_secret, auth_method):
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth_method = auth_method

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope or ""

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method, endpoint):
        return method == self.auth_method

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials"


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    # Each client's own method is enforced by Client.check_endpoint_auth_method.
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


def main():
    # Plain HTTP on loopback, for the test.
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
    clients = {
        c["client_id"]: Client(c["client_id"], c["client_secret"], c["auth_method"])
        for c in json.loads(sys.argv[1])
    }
    app = Flask(__name__)

    def query_client(client_id):
        return clients.get(client_id)

    def save_token(token, request):
        pass

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    server.register_grant(ClientCredentialsGrant)
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"client_credentials": 3600}

    @app.route("/token", methods=["POST"])
    def token():
        response = server.create_token_response()
        method = "basic" if request.headers.get("Authorization") else "post"
        print(f"REQUEST {method} {response.status_code}", flush=True)
        return response

    http = make_server("127.0.0.1", 0, app)
    print(f"PORT {http.server_port}", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
