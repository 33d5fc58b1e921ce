"""A router that checks caller tokens, called by tritonclient with a token PyJWT signed the
seed article's way (`generate_token`: iss = the API key, iat, exp, HS256): both stock, nobody
here wrote them. Usage: tritonclient_auth_check.py ROUTER SECRET

Exits non-zero with a message on the first wrong answer.
"""
import sys
import time

import jwt
import numpy as np
import tritonclient.grpc as tc


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def generate_token(api_key, secret):
    payload = {"iss": api_key, "iat": int(time.time()), "exp": int(time.time()) + 3600}
    return jwt.encode(payload, secret, algorithm="HS256")


def refused(call, status, says):
    try:
        call()
    except tc.InferenceServerException as e:
        check(e.status() == status, f"expected {status}, got {e.status()}: {e.message()}")
        check(says in e.message(), f"{status} without {says!r}: {e.message()}")
        return
    check(False, f"expected {status}, the call was answered")


def main():
    url, secret = sys.argv[1], sys.argv[2]
    c = tc.InferenceServerClient(url)
    auth = {"authorization": f"Bearer {generate_token('key-7', secret)}"}
    x = np.array([[1.5, -2.0, 4.25]], dtype=np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)

    check(c.is_server_live(headers=auth), "ServerLive with a token")
    check(c.is_model_ready("echo", headers=auth), "ModelReady with a token")
    r = c.infer("echo", [inp], headers=auth)
    check(np.array_equal(r.as_numpy("INPUT0"), x), f"echo answer {r.as_numpy('INPUT0')}")

    refused(lambda: c.is_server_live(), "StatusCode.UNAUTHENTICATED", "no bearer token")
    refused(lambda: c.infer("echo", [inp]), "StatusCode.UNAUTHENTICATED", "no bearer token")
    wrong = {"authorization": f"Bearer {generate_token('key-7', secret + 'x')}"}
    refused(lambda: c.infer("echo", [inp], headers=wrong), "StatusCode.UNAUTHENTICATED",
            "does not verify")
    # The seed's token has no priority claim: it may not ask for critical.
    critical = dict(auth, **{"fulcrum-priority": "critical"})
    refused(lambda: c.infer("echo", [inp], headers=critical), "StatusCode.PERMISSION_DENIED",
            'caller "key-7" may ask for priority normal at most')
    print("ok: tokens")


if __name__ == "__main__":
    main()
