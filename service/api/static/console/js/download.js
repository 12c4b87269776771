// Artifact downloads: GET /v1/artifacts/<id>/content with the key as a bearer token (a plain link could not
// send it), checked against the artifact's sha256 in the browser, then saved through a blob: URL.
import { request } from "./api.js";
import { showError } from "./ui.js";

async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export async function downloadArtifact(artifact, button, errorElement, statusElement) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  showError(errorElement, null);
  statusElement.textContent = "Downloading " + artifact.id + "…";
  try {
    const response = await request("/v1/artifacts/" + encodeURIComponent(artifact.id) + "/content", { redirect: "manual" });
    if (response.type === "opaqueredirect") {
      // ALIGND_S3_PRESIGN: the server answers with a presigned URL on the object store, another origin,
      // which the console's Content-Security-Policy (connect-src 'self') does not let it fetch.
      throw new Error("This server hands out downloads as presigned storage URLs (ALIGND_S3_PRESIGN), which the console may not fetch: download " + artifact.id + " with the SDK or curl.");
    }
    const blob = await response.blob();
    // crypto.subtle exists in secure contexts only (https, or http on localhost / 127.0.0.1).
    let check = "sha256 not checked (the browser offers hashing on https or localhost only)";
    if (globalThis.crypto?.subtle) {
      const actual = await sha256Hex(blob);
      if (actual !== artifact.sha256) {
        throw new Error("The download's sha256 is " + actual + ", not the artifact's " + artifact.sha256 + ": not saved.");
      }
      check = "sha256 verified";
    }
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = artifact.id + ".tar.gz";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    statusElement.textContent = "Saved " + artifact.id + ".tar.gz (" + check + ").";
  } catch (error) {
    statusElement.textContent = "";
    showError(errorElement, error);
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}
