"""The object store's own ListObjectsV2 (the sorted index the write-through
keeps) answers as moto does for the same bucket: the same keys, sizes, ETags
and modification times, page by page, with prefixes, start-after and URL
encoding; deletes (single and multi-object) and overwrites keep it equal. (A
restart's index, built from disk, is what the broker restart tests list.)"""

from __future__ import annotations

import hashlib
import itertools
import xml.etree.ElementTree as ET

import pytest
from werkzeug.test import Client

from arbiter.stream.objectstore import DiskMirror

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# moto's server refuses an unsigned DELETE (403); it checks no signature.
HEADERS = {"Host": "localhost", "Authorization": "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, "
                                                 "SignedHeaders=host, Signature=0"}
_bucket_names = (f"list-test-{i}" for i in itertools.count())


@pytest.fixture
def store(tmp_path):
    """(through the mirror, straight to moto, bucket, mirror); moto's backend
    is process-wide, so each test has its own bucket."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    bucket = next(_bucket_names)
    mirror = DiskMirror(tmp_path / "data")
    mirror.load([bucket])
    app = DomainDispatcherApplication(create_backend_app)
    return Client(mirror.wrap(app)), Client(app), bucket, mirror


def listing(client: Client, bucket: str, **params) -> list[dict]:
    """Every page of a ListObjectsV2, followed through its continuation tokens."""
    pages, token = [], None
    while True:
        query = {"list-type": "2", **params, **({"continuation-token": token} if token else {})}
        response = client.get(f"/{bucket}", query_string=query, headers=HEADERS)
        assert response.status_code == 200, response.get_data(as_text=True)
        root = ET.fromstring(response.get_data())
        pages.append({
            "keys": [(c.findtext(f"{NS}Key"), int(c.findtext(f"{NS}Size")), c.findtext(f"{NS}ETag"),
                      c.findtext(f"{NS}LastModified")) for c in root.iter(f"{NS}Contents")],
            "count": int(root.findtext(f"{NS}KeyCount")), "truncated": root.findtext(f"{NS}IsTruncated"),
            "prefix": root.findtext(f"{NS}Prefix"), "start_after": root.findtext(f"{NS}StartAfter")})
        token = root.findtext(f"{NS}NextContinuationToken")
        if not token:
            return pages


KEYS = ["clusters/c/topics/t/partitions/0/records/00000000000000000010.batch",
        "clusters/c/topics/t/partitions/0/records/00000000000000000002.batch",
        "clusters/c/topics/t/partitions/1/records/00000000000000000000.batch",
        "clusters/c/topics/t/partitions/0/watermark.json",
        "clusters/c/groups/consumers/g.json",
        "clusters/c/a key with spaces & <odd> chars",
        "zz/last"]


def put_all(client: Client, bucket: str, keys=KEYS) -> None:
    for i, key in enumerate(keys):
        response = client.put(f"/{bucket}/{key}", data=b"x" * (10 + i), headers=HEADERS)
        assert response.status_code == 200


QUERIES = [{}, {"prefix": "clusters/c/topics/t/partitions/0/"}, {"prefix": "clusters/c/topics/t/partitions/0/records/"},
           {"max-keys": "2"}, {"prefix": "clusters/", "max-keys": "3"}, {"start-after": "clusters/c/groups"},
           {"start-after": "clusters/c/topics/t/partitions/0/records/00000000000000000002.batch", "max-keys": "1"},
           {"prefix": "nothing/"}, {"encoding-type": "url"}, {"prefix": "clusters/c/topics/", "start-after": "a"}]


@pytest.mark.parametrize("params", QUERIES, ids=[str(q) for q in QUERIES])
def test_listing_equals_motos(store, params):
    mirrored, moto, bucket, _ = store
    put_all(mirrored, bucket)
    ours, theirs = listing(mirrored, bucket, **params), listing(moto, bucket, **params)
    assert [p["keys"] for p in ours] == [p["keys"] for p in theirs]
    assert [(p["count"], p["truncated"], p["prefix"], p["start_after"]) for p in ours] == \
        [(p["count"], p["truncated"], p["prefix"], p["start_after"]) for p in theirs]


def test_hand_derived_listing_sizes_and_etags(store):
    mirrored, _, bucket, _ = store
    put_all(mirrored, bucket)
    prefix = "clusters/c/topics/t/partitions/0/"
    keys = [k for p in listing(mirrored, bucket, prefix=prefix) for k in p["keys"]]
    expected = sorted((k, 10 + i) for i, k in enumerate(KEYS) if k.startswith(prefix))
    assert [(k, size) for k, size, _, _ in keys] == expected
    assert all(etag == f'"{hashlib.md5(b"x" * size).hexdigest()}"' for _, size, etag, _ in keys)


def test_deletes_and_overwrites_keep_the_index_equal_to_moto(store):
    mirrored, moto, bucket, _ = store
    put_all(mirrored, bucket)
    assert mirrored.delete(f"/{bucket}/{KEYS[0]}", headers=HEADERS).status_code == 204
    body = ("<Delete>" + "".join(f"<Object><Key>{k}</Key></Object>" for k in KEYS[1:3]) + "</Delete>").encode()
    md5 = __import__("base64").b64encode(hashlib.md5(body).digest()).decode()
    response = mirrored.post(f"/{bucket}", query_string={"delete": ""}, data=body,
                             headers={**HEADERS, "Content-MD5": md5})
    assert response.status_code == 200, response.get_data(as_text=True)
    mirrored.put(f"/{bucket}/{KEYS[3]}", data=b"longer now", headers=HEADERS)
    assert listing(mirrored, bucket) == listing(moto, bucket)
    assert [k for k, *_ in listing(mirrored, bucket)[0]["keys"]] == sorted(KEYS[3:])


def test_a_bad_continuation_token_or_max_keys_is_a_400_naming_it(store):
    mirrored, _, bucket, _ = store
    for params, word in (({"continuation-token": "!!!"}, "continuation token"), ({"max-keys": "-1"}, "max-keys"),
                         ({"max-keys": "many"}, "max-keys")):
        response = mirrored.get(f"/{bucket}", query_string={"list-type": "2", **params}, headers=HEADERS)
        assert response.status_code == 400 and word in response.get_data(as_text=True)


def test_a_delimiter_or_an_unknown_bucket_is_left_to_moto(store):
    mirrored, moto, bucket, _ = store
    put_all(mirrored, bucket)
    query = {"list-type": "2", "delimiter": "/", "prefix": "clusters/c/"}
    assert mirrored.get(f"/{bucket}", query_string=query, headers=HEADERS).get_data() == \
        moto.get(f"/{bucket}", query_string=query, headers=HEADERS).get_data()
    missing = mirrored.get("/no-such-bucket-here", query_string={"list-type": "2"}, headers=HEADERS)
    assert missing.status_code == 404 and b"NoSuchBucket" in missing.get_data()
