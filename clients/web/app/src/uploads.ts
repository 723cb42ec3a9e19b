// Attachments: direct signed upload (CreateUpload → PUT the bytes to the signed URL →
// CompleteUpload), and download links minted on demand (GetDownloadUrl).
import type { ThreadlineClient } from "../../src/index.js";

/** Uploads one file and resolves with its upload id, ready to attach to a message. */
export async function uploadFile(client: ThreadlineClient, file: File): Promise<string> {
  const created = await client.uploads.createUpload({
    fileName: file.name,
    contentType: file.type || "application/octet-stream",
    sizeBytes: BigInt(file.size),
    clientOpId: crypto.randomUUID(),
  });
  const uploadId = created.upload?.id ?? "";
  const response = await fetch(created.uploadUrl, {
    method: created.uploadMethod || "PUT",
    headers: created.uploadHeaders,
    body: file,
  });
  if (!response.ok) throw new Error(`upload of ${file.name} failed: HTTP ${response.status}`);
  await client.uploads.completeUpload({ uploadId });
  return uploadId;
}

/** Fetches a short-lived download URL and starts the download. */
export async function download(client: ThreadlineClient, uploadId: string, fileName: string): Promise<void> {
  const { downloadUrl } = await client.uploads.getDownloadUrl({ uploadId });
  const link = document.createElement("a");
  link.href = downloadUrl;
  link.download = fileName;
  link.rel = "noopener";
  document.body.append(link);
  link.click();
  link.remove();
}
