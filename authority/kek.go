package authority

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// EnvKEK names the environment variable that may carry the CA's
// key-encryption key instead of a file.
const EnvKEK = "WRIT_CA_KEK"

// kekSize is the length of a key-encryption key: an AES-256 key.
const kekSize = 32

// maxKEKFile bounds what LoadKEK reads: a KEK is 44 characters of base64.
const maxKEKFile = 4096

// GenerateKEK returns a new random key-encryption key in the form LoadKEK
// reads: standard base64 of 32 random bytes.
func GenerateKEK() (string, error) {
	k := make([]byte, kekSize)
	if _, err := rand.Read(k); err != nil {
		return "", fmt.Errorf("generate kek: %w", err)
	}
	return base64.StdEncoding.EncodeToString(k), nil
}

// LoadKEK reads the key-encryption key that seals the root CA key at rest:
// from file when file is set, otherwise from the WRIT_CA_KEK variable that
// getenv returns. Either holds standard base64 of exactly 32 bytes. A
// missing or malformed KEK is an error: the CA never runs with its root key
// in the clear.
func LoadKEK(file string, getenv func(string) string) ([]byte, error) {
	var text, from string
	switch {
	case file != "":
		f, err := os.Open(file)
		if err != nil {
			return nil, fmt.Errorf("load ca kek: %w", err)
		}
		defer f.Close()
		buf, err := io.ReadAll(io.LimitReader(f, maxKEKFile+1))
		if err != nil {
			return nil, fmt.Errorf("load ca kek from %s: %w", file, err)
		}
		if len(buf) > maxKEKFile {
			return nil, fmt.Errorf("load ca kek from %s: file is larger than %d bytes", file, maxKEKFile)
		}
		text, from = string(buf), file
	case getenv != nil && getenv(EnvKEK) != "":
		text, from = getenv(EnvKEK), EnvKEK
	default:
		return nil, fmt.Errorf("load ca kek: no key-encryption key: set ca.kek_file or %s (generate one with `writ ca gen-kek`)", EnvKEK)
	}
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return nil, fmt.Errorf("load ca kek from %s: not base64", from)
	}
	if len(k) != kekSize {
		return nil, fmt.Errorf("load ca kek from %s: got %d bytes, want %d", from, len(k), kekSize)
	}
	return k, nil
}

// errWrongKEK is returned when a sealed root key does not open: either the
// operator supplied a different KEK than the one the key was sealed with,
// or the stored key was altered.
var errWrongKEK = errors.New("the ca key-encryption key (KEK) does not open the stored key: it is not the KEK the key was sealed with, or the stored key was altered")

func rootAAD(rootID string) []byte { return []byte("writ ca root key " + rootID) }

// jwtAAD binds a sealed JWT signing key to its key id.
func jwtAAD(kid string) []byte { return []byte("writ ca jwt key " + kid) }

// seal encrypts a key with AES-256-GCM; aad names the key's row (rootAAD,
// jwtAAD), so a sealed key cannot be moved to another row.
func seal(kek, aad, plain []byte) ([]byte, error) {
	aead, err := newAEAD(kek)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plain)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("seal key: %w", err)
	}
	return aead.Seal(nonce, nonce, plain, aad), nil
}

// unseal opens a sealed key; name is for error messages.
func unseal(kek, aad []byte, name string, sealed []byte) ([]byte, error) {
	aead, err := newAEAD(kek)
	if err != nil {
		return nil, err
	}
	if len(sealed) < aead.NonceSize()+aead.Overhead() {
		return nil, fmt.Errorf("unseal %s: sealed key is truncated", name)
	}
	n := aead.NonceSize()
	plain, err := aead.Open(nil, sealed[:n], sealed[n:], aad)
	if err != nil {
		return nil, fmt.Errorf("unseal %s: %w", name, errWrongKEK)
	}
	return plain, nil
}

func newAEAD(kek []byte) (cipher.AEAD, error) {
	if len(kek) != kekSize {
		return nil, fmt.Errorf("ca kek: got %d bytes, want %d", len(kek), kekSize)
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, fmt.Errorf("ca kek: %w", err)
	}
	return cipher.NewGCM(block)
}
